"""Search your own videos: an embedding index over a folder, two-stage retrieval, CLI and web page.

- `model`: the encoders a search uses (`SearchModel`) and `load_retrieval_model(checkpoint)`.
- `index`: building / incrementally updating an index directory (`build_index`, `SearchIndex`).
- `retrieve`: exact pooled top-k first stage + DMAE (text) or max-mean (video) re-scoring.
- `server`: the local web page and its JSON API (stdlib `http.server`).

Entry points: `python -m tvr_jax.index`, `python -m tvr_jax.search`, `python -m tvr_jax.serve`.
See docs/search.md.
"""
