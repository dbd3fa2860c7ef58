"""One module per method; each exposes ``METHOD``, a :class:`jpeft.methods.base.Method`."""

from jpeft.methods import adalora
from jpeft.methods import adamix
from jpeft.methods import adapter
from jpeft.methods import bitfit
from jpeft.methods import boft
from jpeft.methods import dora
from jpeft.methods import dylora
from jpeft.methods import full
from jpeft.methods import hoft
from jpeft.methods import hra
from jpeft.methods import ia3
from jpeft.methods import loha
from jpeft.methods import lokr
from jpeft.methods import lora
from jpeft.methods import loraxs
from jpeft.methods import loreft
from jpeft.methods import mora
from jpeft.methods import oft
from jpeft.methods import p_tuning
from jpeft.methods import pasta
from jpeft.methods import prefix_tuning
from jpeft.methods import prompt_tuning
from jpeft.methods import rhoft
from jpeft.methods import sbora
from jpeft.methods import shoft
from jpeft.methods import svft
from jpeft.methods import vera
from jpeft.methods.base import Method

# registry order is the order of every table (jpeft count, the demo, bench)
BUILTIN = {
    "lora": lora.METHOD,
    "dora": dora.METHOD,
    "lokr": lokr.METHOD,
    "oft": oft.METHOD,
    "boft": boft.METHOD,
    "shoft": shoft.METHOD,
    "rhoft": rhoft.METHOD,
    "hra": hra.METHOD,
    # the seeds' other weight-space methods
    "loha": loha.METHOD,
    "ia3": ia3.METHOD,
    "vera": vera.METHOD,
    "dylora": dylora.METHOD,
    "adalora": adalora.METHOD,
    "mora": mora.METHOD,
    "sbora": sbora.METHOD,
    "hoft": hoft.METHOD,
    "svft": svft.METHOD,
    "loraxs": loraxs.METHOD,
    # methods that add computation at the model's hook points (jpeft.hooks)
    "prompt_tuning": prompt_tuning.METHOD,
    "adapter": adapter.METHOD,
    "adamix": adamix.METHOD,
    "p_tuning": p_tuning.METHOD,
    "prefix_tuning": prefix_tuning.METHOD,
    "pasta": pasta.METHOD,
    "loreft": loreft.METHOD,
    "bitfit": bitfit.METHOD,
    "full": full.METHOD,
}

__all__ = ["BUILTIN", "Method"]
