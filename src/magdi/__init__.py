"""MAGDi: structured distillation of multi-agent interaction graphs.

Every paper equation lives in exactly one module:
- answers / scoring ............ ``magdi.scoring``
- ReConcile discussion ......... ``magdi.discussion``
- MAG nodes, edges, PyG ........ ``magdi.mag``
- L_ntp, L_contrastive, L_graph  ``magdi.losses``
- GCN / attention encoders ..... ``magdi.encoders``
"""

__version__ = "0.1.0"
