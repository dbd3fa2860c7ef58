"""One module per method; each exposes ``METHOD``, a :class:`jpeft.methods.base.Method`."""

from jpeft.methods import bitfit, boft, dora, full, hra, lokr, lora, oft, rhoft, shoft
from jpeft.methods.base import Method

BUILTIN = {
    "lora": lora.METHOD,
    "dora": dora.METHOD,
    "lokr": lokr.METHOD,
    "oft": oft.METHOD,
    "boft": boft.METHOD,
    "shoft": shoft.METHOD,
    "rhoft": rhoft.METHOD,
    "hra": hra.METHOD,
    "bitfit": bitfit.METHOD,
    "full": full.METHOD,
}

__all__ = ["BUILTIN", "Method"]
