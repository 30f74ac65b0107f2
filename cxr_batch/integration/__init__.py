"""The hospital-facing side: one module per protocol.

- :mod:`.node`: the DICOM storage SCP behind ``cxr-batch listen`` (C-STORE in, spool, ledger);
- :mod:`.dicom_send`: C-STORE out (SRs and encapsulated PDFs back to the PACS);
- :mod:`.outbound`: the durable queue that sends each result until the receiver has it.
"""
