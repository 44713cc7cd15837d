"""The status page's style and its one small script, inlined in the page (no external request;
the Content-Security-Policy allows this script by its hash and nothing else).

The script does two things, and the page reads fine without it:
- refresh: every few seconds it fetches the page again and swaps in its `<main>` (open error
  details stay open); without scripts a `<noscript>` meta refresh reloads the whole page.
- actions: the key typed into the page is kept in the tab's sessionStorage (gone with the tab,
  never a cookie) and sent as `Authorization: Bearer` by fetch to the admin routes, from the
  page's own origin (docs/access.md, rule 4).
"""

from __future__ import annotations

import base64
import hashlib

REFRESH_S = 5

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
  background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 28px;display:flex;align-items:center;gap:16px;
  flex-wrap:wrap}
header h1{font-size:19px;margin:0;font-weight:600}
header .meta{color:#aab3c5;font-size:13px}
header form{margin-left:auto;display:flex;gap:6px;align-items:center}
header input{font:inherit;padding:4px 8px;border-radius:6px;border:1px solid #475467;
  background:#101828;color:#fff;width:210px}
header .keystate{color:#aab3c5;font-size:12px}
button{font:inherit;font-size:12px;padding:3px 10px;border-radius:6px;border:1px solid #98a2b3;
  background:#fff;color:#1d2330;cursor:pointer}
button:disabled{opacity:.45;cursor:default}
header button{background:#344054;color:#fff;border-color:#475467}
#notice{display:block;padding:0 28px;min-height:0}
#notice:not(:empty){padding:8px 28px;background:#ecfdf3;color:#05603a;
  border-bottom:1px solid #abefc6}
#notice.bad{background:#fef3f2;color:#b42318;border-color:#fecdca}
.js-only{display:none}
[hidden]{display:none!important}
html.js .js-only{display:revert}
html.js form.js-only{display:flex}
main{padding:16px 28px;max-width:1480px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:8px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:19px;font-weight:600}
.card small{color:#667085;text-transform:uppercase;letter-spacing:.04em;font-size:11px}
h2{font-size:15px;margin:20px 0 8px}
h2 small{font-weight:400;color:#667085}
.nodes{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:12px}
.node{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px 14px}
.node .head{display:flex;justify-content:space-between;gap:8px}
.node .head span{color:#667085;font-size:12px}
.membar{position:relative;height:16px;background:#eaecf0;border-radius:4px;margin:8px 0 4px;
  overflow:hidden;display:flex}
.membar .seg{height:100%;border-right:1px solid #fff}
.membar .other{background:#98a2b3}
.membar .loading,.membar .unloading{opacity:.55}
.membar .configured{position:absolute;top:0;bottom:0;width:2px;background:#1d2330}
.membar.over{outline:2px solid #d92d20}
.node small{color:#475467}
.timeline{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:8px}
.timeline svg{display:block}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e8}
th,td{padding:6px 10px;text-align:left;border-bottom:1px solid #eceef2;white-space:nowrap;
  vertical-align:top}
th{background:#fafbfc;color:#667085;font-weight:600;font-size:12px}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.route td{background:#fcfcfd;color:#475467}
tr.route td:first-child{padding-left:26px}
.alias,.sub{color:#667085;font-size:12px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
.state{display:inline-block;padding:1px 9px;border-radius:10px;font-size:12px;font-weight:600}
.loaded{background:#d1fadf;color:#05603a}
.loading,.unloading,.running{background:#fef0c7;color:#93370d}
.unloaded,.not-carried-out{background:#eaecf0;color:#475467}
.failed{background:#fee4e2;color:#b42318}
progress{width:90px;height:8px;vertical-align:middle}
.dot{display:inline-block;width:8px;height:8px;border-radius:50%;margin-right:5px}
.up{background:#12b76a}.down{background:#d92d20}
td.error{white-space:normal}
details.error{width:280px;color:#b42318}
details.error summary{cursor:pointer;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
details.error pre{white-space:pre-wrap;word-break:break-word;font-size:12px;margin:6px 0 0;
  max-height:320px;overflow:auto}
.scroll{overflow-x:auto}
td.actions button{margin-right:4px}
.empty{color:#667085;padding:12px}
footer{color:#98a2b3;font-size:12px;padding:8px 28px 20px}
"""

SCRIPT = """
(() => {
  const KEY = "swapper-gateway.key";
  const root = document.documentElement;
  root.classList.add("js");
  const $ = (id) => document.getElementById(id);
  const notice = $("notice");
  const key = () => sessionStorage.getItem(KEY);
  const auth = () => (key() ? {Authorization: "Bearer " + key()} : {});
  const say = (text, bad) => { notice.textContent = text; notice.className = bad ? "bad" : ""; };
  const showKey = () => { $("keystate").textContent = key() ? "key set for this tab" : ""; };
  const routes = {
    load: (m) => ["POST", "/models/" + encodeURIComponent(m) + "/load"],
    unload: (m) => ["POST", "/models/" + encodeURIComponent(m) + "/unload"],
    purge: (m) => ["DELETE", "/cache?model=" + encodeURIComponent(m)],
    reload: () => ["POST", "/admin/reload"],
  };

  async function act(button) {
    const {action, model} = button.dataset;
    const [method, path] = routes[action](model);
    const what = model ? action + " " + model : action + " the config";
    say(what + "\\u2026");
    button.disabled = true;
    try {
      const answer = await fetch(path, {method, headers: auth(), cache: "no-store"});
      const body = await answer.json().catch(() => ({}));
      if (answer.ok) {
        const removed = body.removed === undefined ? "" : " (" + body.removed + " entries)";
        say(what + ": done" + removed);
      } else {
        const why = (body.error && body.error.message) || answer.statusText;
        const denied = answer.status === 401 || answer.status === 403;
        const hint = denied ? " Enter an admin key above." : "";
        say(what + ": refused (" + answer.status + "): " + why + hint, true);
      }
    } catch (error) {
      say(what + ": the gateway did not answer (" + error + ")", true);
    }
    refresh();
  }

  let refreshing = false;
  async function refresh() {
    if (refreshing) return;
    refreshing = true;
    try {
      const answer = await fetch(location.pathname, {headers: auth(), cache: "no-store"});
      if (answer.ok) {
        swap(new DOMParser().parseFromString(await answer.text(), "text/html"));
      } else if (answer.status === 401 && key()) {
        say("the key entered is not valid here", true);
      }
    } catch (error) {
      say("the gateway did not answer: showing what it said last", true);
    } finally {
      refreshing = false;
    }
  }

  function swap(page) {
    const fresh = page.getElementById("live");
    if (!fresh) return;
    const open = [...document.querySelectorAll("details[open]")].map((d) => d.id);
    $("live").replaceWith(fresh);
    open.forEach((id) => { const d = $(id); if (d) d.open = true; });
    const admin = fresh.dataset.admin === "true";
    document.querySelectorAll("[data-admin-only]").forEach((e) => { e.hidden = !admin; });
  }

  $("keyform").addEventListener("submit", (event) => {
    event.preventDefault();
    const typed = $("key").value.trim();
    if (typed) sessionStorage.setItem(KEY, typed);
    $("key").value = "";
    showKey();
    refresh();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showKey();
    say("key forgotten");
    refresh();
  });
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) act(button);
  });
  showKey();
  if (key()) refresh();
  setInterval(refresh, REFRESH_MS);
})();
""".replace("REFRESH_MS", str(REFRESH_S * 1000))

SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()

# Nothing but this page's own style, its one script and fetches to its own origin.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src '{SCRIPT_HASH}'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
