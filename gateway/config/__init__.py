"""The configuration: `schema` (what the typed config is), `reader` (YAML and the environment
read into it, every problem named), `catalog` (model names and aliases to routes), `discovery`
(models found on an Ollama) and `reload` (re-reading it safely)."""
