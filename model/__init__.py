"""UniCT: a unified multi-task model for 3D chest CT (classification, segmentation, report).

The package holds the network (:mod:`model.network`), the label set and model card
(:mod:`model.labels`, :mod:`model.card`), the preprocessing shared by training and
inference (:mod:`model.transforms`), the synthetic chest-CT phantoms (:mod:`model.phantom`),
the dataset readers (:mod:`model.datasets`) and training/evaluation (:mod:`model.training`).
"""
