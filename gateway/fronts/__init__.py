"""The APIs clients speak, one module each: `openai` (/v1), `swapper` (the old Swapper Service
routes), `admin` (/admin, /cache) and `ui` (the status page)."""
