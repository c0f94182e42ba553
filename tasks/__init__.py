"""The Celery layer and the caller SDK: ``app`` and ``transport`` (the Celery app on a hardened Redis
channel), ``worker`` (one thin task per operation, handing each message to ``worker.pipeline``), ``codec``
(requests built and replies opened, without a broker), ``client`` (KmsClient and AsyncKmsClient) and
``identity`` (caller identity and fleet files)."""
