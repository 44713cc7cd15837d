"""How the status page writes times: durations a person reads at a glance, load times in
milliseconds (a 22 ms load is not "0.0 s"), clock times of the gateway's own zone."""

from __future__ import annotations

from datetime import datetime

BLANK = "\u2013"  # an en dash where there is no value (yet)


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def load_time(seconds: float | None) -> str:
    """Milliseconds, up to a minute (past that, a person reads minutes better)."""
    if seconds is None:
        return BLANK
    return f"{seconds * 1000:,.0f} ms" if seconds < 60 else duration(seconds)


def ago(wall: float | None, now: float) -> str:
    return BLANK if wall is None else f"{duration(max(0.0, now - wall))} ago"


def within(wall: float | None, now: float) -> str:
    return BLANK if wall is None else f"in {duration(max(0.0, wall - now))}"


def clock(wall: float) -> str:
    return datetime.fromtimestamp(wall).strftime("%H:%M:%S")


def zone(wall: float) -> str:
    """The gateway's zone, as the page's clock times are written in it."""
    local = datetime.fromtimestamp(wall).astimezone()
    name, offset = local.strftime("%Z"), local.strftime("%z")
    return "UTC" if offset == "+0000" else f"{name} (UTC{offset[:3]}:{offset[3:]})"


def gigabytes(value: float) -> str:
    return f"{value:.1f} GB" if value < 100 else f"{value:.0f} GB"
