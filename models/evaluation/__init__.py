"""Evaluation as a library (below tools/, which only parse arguments and call into it).

* ``metrics``: FID / sFID / IS / KID / precision-recall through torch-fidelity, image sets, reference batches and
  their cache, feature-extractor resolution (``tools/evaluate.py``).
* ``generation``: per-index seeded sampling, chunking, decoding latents to images (tokenizer + statistics),
  PNG / npz files (``tools/sample.py``).
* ``in_loop``: the trainer's in-loop evaluation of a class-conditional generator (``DiTTask.evaluate``).
* ``reconstruction``: tokenizer reconstruction metrics, PSNR / SSIM / LPIPS / rFID (``tools/eval_tokenizer.py``).
* ``leaderboard``: a leaderboard of runs by their best in-loop FID (``tools/leaderboard.py``), over the run
  logs ``core.runlog`` reads.
"""
