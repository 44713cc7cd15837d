"""Who may call and how much: `auth` (API keys, per-key limits) and `request_limits`
(the header size limit)."""
