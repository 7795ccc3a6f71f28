"""sdworker: the machinery behind app.py.

The core (config, errors, schema, model, schedulers, generate, images, handler) knows no platform, no HTTP
server and no queue; platforms receive the app at run time. Importing this package is cheap: nothing heavy is
imported until a submodule is.
"""

import logging as _logging

__version__ = "0.1.0"

# With torchao installed (the image's QUANTIZE), importing diffusers logs warnings that are nobody's fault: its
# CUDA kernels missing on a CPU, torch's notes on torchao's enums, diffusers' checks of older torchao classes. They
# would bury the one line a failure prints. Set here, before anything imports diffusers.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
