"""The configuration: `schema` (typed config read from YAML and the environment), `catalog` (model
names and aliases to routes), `discovery` (models found on an Ollama) and `reload` (re-reading it
safely)."""
