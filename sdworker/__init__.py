"""sdworker: the machinery behind app.py.

The core (config, errors, schema, model, schedulers, generate, images, handler) knows no platform, no HTTP
server and no queue; platforms receive the app at run time. Importing this package is cheap: nothing heavy is
imported until a submodule is.
"""

__version__ = "0.1.0"
