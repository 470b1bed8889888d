"""Training programs: one loop (`loop`), typed run configs (`config`), world-size independent
checkpoints (`checkpoint`), resumable data order (`data`), one way to start a program (`launch`:
command line, process group, device), and the entry points `python -m training.encoder` (LVFace
encoders, PCO / Partial FC / LoRA) and `training.adapter`.

Not part of the installed `lvface_mm` wheel; run from the repository root.
"""
