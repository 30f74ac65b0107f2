"""The hospital-facing side: one module per protocol.

- :mod:`.node`: the DICOM storage SCP behind ``cxr-batch listen`` (C-STORE in, spool, ledger);
- :mod:`.pull`: ``cxr-batch pull``, C-FIND and C-MOVE/C-GET from a PACS into the node's path;
- :mod:`.dicom_send`: C-STORE out (SRs and encapsulated PDFs back to the PACS);
- :mod:`.outbound`: the durable queue that sends each result until the receiver has it;
- :mod:`.outbox`: a run's channels (C-STORE, HL7, STOW-RS): what each study queues, their senders;
- :mod:`.hl7`: HL7 v2.5 ORU^R01 to the RIS over MLLP (the study's priority and findings);
- :mod:`.dicomweb`: STOW-RS of result objects to a DICOMweb archive;
- :mod:`.delivery`: the delivered / retry / rejected answer of HL7 and STOW-RS sends.
"""
