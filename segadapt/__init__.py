"""segadapt: parameter-efficient adaptation of medical and vision segmentation networks."""

from segadapt.names import register_resolvers

__version__ = "0.1.0"

register_resolvers()  # the resolvers configs/ interpolates with (segadapt/names.py)
