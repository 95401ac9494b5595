"""Built-in methods. Adding one: a file here and one import line below."""

from uda_cli.methods import source_only  # noqa: F401
from uda_cli.methods import i2i  # noqa: F401
from uda_cli.methods import pixelda  # noqa: F401
from uda_cli.methods import dann  # noqa: F401
from uda_cli.methods import dtn  # noqa: F401
from uda_cli.methods import advent  # noqa: F401
from uda_cli.methods import cbst  # noqa: F401
from uda_cli.methods import crst  # noqa: F401
from uda_cli.methods import tpld  # noqa: F401
from uda_cli.methods import lsd  # noqa: F401
