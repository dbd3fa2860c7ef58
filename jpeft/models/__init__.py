"""Model ports whose linear layers accept jpeft nodes (see :func:`jpeft.linear`)."""

from jpeft.models import phi

__all__ = ["phi"]
