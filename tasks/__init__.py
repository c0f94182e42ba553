"""The only Celery code: the app, thin task functions and the caller client (the queue issue builds it)."""
