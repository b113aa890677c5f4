"""ditlab: post-training quantization lab for Diffusion Transformers."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes warns at import about an optional 'kernels' package that would download code from a hub at run
# time; ditlab never installs it, so the warning is noise.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
