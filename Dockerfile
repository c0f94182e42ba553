# kmsq with its embedded SoftHSM2 token. The token and its PIN file live in KMSQ_HOME (a volume).
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends softhsm2 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . .
RUN pip install --no-cache-dir ".[worker,gateway]"

# An unprivileged user owning KMSQ_HOME; a new named volume mounted there inherits this ownership.
RUN useradd --system --home-dir /var/lib/kmsq --shell /usr/sbin/nologin kmsq \
    && install -d -o kmsq -g kmsq -m 0700 /var/lib/kmsq
USER kmsq
ENV KMSQ_HOME=/var/lib/kmsq

CMD ["kmsq", "--help"]
