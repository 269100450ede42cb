"""segadapt: parameter-efficient adaptation of medical and vision segmentation networks."""

__version__ = "0.1.0"
