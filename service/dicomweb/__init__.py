"""DICOMweb: the STOW-RS receiver (``POST /studies``) and STOW-RS destinations.

- :mod:`service.dicomweb.settings`: the ``dicomweb`` section and ``type: dicomweb``
  destinations;
- :mod:`service.dicomweb.multipart`: a streaming ``multipart/related`` parser;
- :mod:`service.dicomweb.stow_response`: the Store Instances Response (PS3.18 §10.5.3) in
  DICOM JSON or XML;
- :mod:`service.dicomweb.stow`: the ``POST /studies`` handler, on the receiver's ingest path;
- :mod:`service.dicomweb.client`: the STOW-RS sender used for ``type: dicomweb`` destinations.

The submodules are imported by name (this package imports none of them), so the settings
can be read without the HTTP stack.
"""
