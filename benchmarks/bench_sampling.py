"""Time to sample 16 images at 25 steps (CFG) with the shipped tiny DiT, fp32 vs bf16. Prints a markdown table.

Same as `python -m ditlab bench sampling`.
"""

from ditlab.cli import main

raise SystemExit(main(["bench", "sampling"]))
