"""How the outputs identify the algorithm that made them (IHE AI Results, AIR).

IHE AIR (Rad TF-3, "AI Results", 6.5.3.1) asks every result object to carry one
Contributing Equipment item for the algorithm: Purpose of Reference
``(Newcode1, 99IHE, "Processing Algorithm")``, Manufacturer, Manufacturer's Model Name,
Software Versions and a Device UID that identifies this algorithm *as trained*: here it
is derived from the checkpoint's SHA-256, so new weights give a new Device UID even
under the same version string. The SR's device observer (TID 1004) uses the same UID.
"""

from __future__ import annotations

import datetime as dt

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from model.card import ModelCard

#: IHE AIR's Purpose of Reference for the algorithm's Contributing Equipment item.
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")


def device_uid(card: ModelCard) -> str:
    """The algorithm's Device UID: stable for one set of weights, new for new weights."""
    return str(
        generate_uid(
            entropy_srcs=[
                "unict-node algorithm",
                card.name,
                card.version,
                card.checkpoint_sha256 or card.checkpoint_file,
            ]
        )
    )


def contributing_equipment(card: ModelCard, description: str) -> hd.ContributingEquipment:
    """The algorithm as IHE AIR's Contributing Equipment item (with its Device UID)."""
    item = hd.ContributingEquipment(
        manufacturer=card.manufacturer,
        # highdicom accepts only CID 7005 here; IHE AIR's code replaces it below.
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=card.name,
        software_versions=card.version,
        contribution_datetime=dt.datetime.now(),
        contribution_description=description,
    )
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    # Device UID (0018,1002) is in the General Equipment attributes an item may carry
    # (PS3.3 C.12.1.1.5); highdicom's class has no argument for it.
    item.DeviceUID = device_uid(card)
    return item
