# kmsq with its embedded SoftHSM2 token. The token and its PIN file live in KMSQ_HOME (a volume).
#
# The first stage builds the wheel from the sources; the image installs exactly that wheel, with the extras
# worker and gateway, as a user's `pip install` would: no source tree and no editable install in the image.
# tests/test_wheel.py builds and installs the same wheel in a fresh virtualenv and runs kmsq init and demo.
FROM python:3.11-slim-bookworm AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/dist .

FROM python:3.11-slim-bookworm

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends softhsm2 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=wheel /tmp/dist/ /tmp/dist/
RUN pip install --no-cache-dir "$(ls /tmp/dist/kmsq-*.whl)[worker,gateway]" \
    && rm -rf /tmp/dist
# Every command module imports: a module missing from the wheel fails the build here.
RUN kmsq --help >/dev/null

# An unprivileged user owning KMSQ_HOME; a new named volume mounted there inherits this ownership.
RUN useradd --system --home-dir /var/lib/kmsq --shell /usr/sbin/nologin kmsq \
    && install -d -o kmsq -g kmsq -m 0700 /var/lib/kmsq
USER kmsq
ENV KMSQ_HOME=/var/lib/kmsq
WORKDIR /var/lib/kmsq

CMD ["kmsq", "--help"]
