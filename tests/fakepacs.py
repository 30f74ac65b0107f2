"""A PACS made with pynetdicom in the test's process (Study Root C-FIND, C-GET, C-MOVE) whose answers
a test chooses, for the ways real archives differ from the standard and hostile ones abuse it."""

from __future__ import annotations

import pydicom

from tests.watchkit import free_port


class ScriptedPACS:
    """Answers C-FIND at study, series and image level from ``files`` and sends them by C-GET or
    C-MOVE (to 127.0.0.1:``move_to``, which the test sets).

    - ``modalities_key``: "answered" (study answers carry ModalitiesInStudy), "ignored" (they do
      not, as archives that ignore the key), "refused" (a query holding it gets 0xA900);
    - ``studies``: extra study-level answers (datasets), sent before the real ones;
    - ``refuse``: study UIDs whose series-level C-FIND fails (0xC000);
    - ``study_status``: a status answering every study-level C-FIND;
    - ``moved``: what a C-GET or C-MOVE sends instead of the objects asked for.

    ``queries`` holds every C-FIND identifier received, in order."""

    def __init__(self, files, ae_title: str = "PACS", modalities_key: str = "answered", studies=(), refuse=(),
                 study_status: int | None = None, moved=None):
        from pynetdicom import AE, StoragePresentationContexts, evt
        from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                          StudyRootQueryRetrieveInformationModelGet,
                                          StudyRootQueryRetrieveInformationModelMove)

        self.datasets = [pydicom.dcmread(f) for f in files]
        self.ae_title, self.modalities_key = ae_title, modalities_key
        self.studies, self.refuse, self.study_status, self.moved = list(studies), set(refuse), study_status, moved
        self.queries, self.move_to = [], None
        ae = AE(ae_title=ae_title)
        for model in (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
                      StudyRootQueryRetrieveInformationModelMove):
            ae.add_supported_context(model)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, scu_role=True, scp_role=True)
            ae.add_requested_context(cx.abstract_syntax)  # C-MOVE: this PACS sends, as a storage SCU
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_FIND, self.find), (evt.EVT_C_GET, self.get),
                                                    (evt.EVT_C_MOVE, self.move)])

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def levels(self) -> list[str]:
        return [q.QueryRetrieveLevel for q in self.queries]

    def _matches(self, query, ds) -> bool:
        return all(str(ds.get(k, "")) == str(query.get(k)) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                                      "SOPInstanceUID") if query.get(k))

    def find(self, event):
        query = event.identifier
        self.queries.append(query)
        level = query.QueryRetrieveLevel
        if self.modalities_key == "refused" and "ModalitiesInStudy" in query and query.ModalitiesInStudy:
            yield 0xA900, None
            return
        if level == "STUDY":
            if self.study_status is not None:
                yield self.study_status, None
                return
            yield from ((0xFF00, s) for s in self.studies)
        elif query.StudyInstanceUID in self.refuse:
            yield 0xC000, None
            return
        seen = set()
        for ds in self.datasets:
            if not self._matches(query, ds):
                continue
            uid = {"STUDY": ds.StudyInstanceUID, "SERIES": ds.SeriesInstanceUID, "IMAGE": ds.SOPInstanceUID}[level]
            if uid in seen:
                continue
            seen.add(uid)
            answer = pydicom.Dataset()
            answer.QueryRetrieveLevel = level
            answer.StudyInstanceUID, answer.StudyDate = ds.StudyInstanceUID, ds.StudyDate
            if level == "STUDY" and self.modalities_key == "answered":
                answer.ModalitiesInStudy = ds.Modality
            if level == "STUDY":  # whose, where asked: as the object says
                for key in ("PatientID", "IssuerOfPatientID", "PatientName"):
                    if key in query:
                        setattr(answer, key, ds.get(key, ""))
            if level != "STUDY":
                answer.SeriesInstanceUID, answer.Modality = ds.SeriesInstanceUID, ds.Modality
            if level == "IMAGE":
                answer.SOPInstanceUID = ds.SOPInstanceUID
                if "SOPClassUID" in query:  # a return key, answered where asked
                    answer.SOPClassUID = ds.SOPClassUID
            yield 0xFF00, answer

    def _sent(self, identifier):
        if self.moved is not None:
            return self.moved
        return [ds for ds in self.datasets if self._matches(identifier, ds)]

    def get(self, event):
        chosen = self._sent(event.identifier)
        yield len(chosen)
        for ds in chosen:
            yield 0xFF00, ds

    def move(self, event):
        yield "127.0.0.1", self.move_to
        chosen = self._sent(event.identifier)
        yield len(chosen)
        for ds in chosen:
            yield 0xFF00, ds

    def close(self):
        self.server.shutdown()
