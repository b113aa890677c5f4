"""ditlab: post-training quantization lab for Diffusion Transformers."""

import logging as _logging
import os as _os

__version__ = "0.1.0"

# Triton decides once, when it is first imported, whether kernels are compiled or interpreted; diffusers and
# bitsandbytes import it early. So the interpreter backend has to be chosen before anything else is imported.
if _os.environ.get("DITLAB_BACKEND", "").strip() == "triton-interpret":
    _os.environ.setdefault("TRITON_INTERPRET", "1")

# bitsandbytes warns at import about an optional 'kernels' package that would download code from a hub at run
# time; ditlab never installs it, so the warning is noise.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
