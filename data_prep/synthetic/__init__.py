"""Synthetic captioned-video set: procedurally rendered moving shapes, no download needed.

- `render`: pixels of one clip (torus motion: no single frame reveals the direction).
- `generate`: `SyntheticConfig`, distractor pairs, captions, mp4 encoding, the raw tree.
- `builder`: the TFDS builder (`python -m data_prep.build synthetic --data_dir=OUT`).
- `python -m data_prep.synthetic --out RAW [...]`: render a custom raw tree.

See docs/synthetic.md.
"""
