"""UniCT Node: the DICOM node (receiver, jobs, pipeline, outputs, sender, HTTP)."""
