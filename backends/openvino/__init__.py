"""OpenVINO's CPU plugin as an autoq backend.

`backend.py` builds a candidate per assignment (through NNCF) and reads back each layer's runtime precision from
the compiled model; `nncf_build.py` quantizes (static int8, the float layers in its ignored scope) and compresses
weights per spec; `recipes.py` lists OpenVINO's and NNCF's one-line recipes.
"""

from autoq.backends.openvino.backend import FLOAT_OPTION, OpenVinoBackend

__all__ = ["FLOAT_OPTION", "OpenVinoBackend"]
