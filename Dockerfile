# syncd in a container: config at /etc/syncd, state on the volume /var/lib/syncd.
#   docker build -t syncd .
#   docker run -d --name syncd --stop-timeout 30 -v $PWD/conf.d:/etc/syncd/conf.d:ro -v syncd-state:/var/lib/syncd \
#       -e SYNCD_WEBHOOK_SECRET=whsec_... -p 127.0.0.1:9731:9731 syncd
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY syncd ./syncd
RUN pip install . && rm -rf /src \
    && useradd --system --uid 10001 --home-dir /var/lib/syncd --shell /usr/sbin/nologin syncd \
    && mkdir -p /etc/syncd/conf.d /var/lib/syncd \
    && chown syncd:syncd /var/lib/syncd

# Inside a container the metrics endpoint must listen on all interfaces to be published.
ENV SYNCD_CONFIG_DIR=/etc/syncd/conf.d \
    SYNCD_STATE_PATH=/var/lib/syncd/state.db \
    SYNCD_LISTEN=0.0.0.0:9731 \
    SYNCD_LOG_FORMAT=json \
    SYNCD_SHUTDOWN_TIMEOUT=8s

WORKDIR /var/lib/syncd
VOLUME ["/var/lib/syncd"]
EXPOSE 9731
USER syncd

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('SYNCD_LISTEN', ':9731').rpartition(':')[2]; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

# docker stop waits 10 s before SIGKILL: shutdown_timeout is 8 s so syncd exits 0 in time.
STOPSIGNAL SIGTERM
ENTRYPOINT ["syncd"]
CMD ["run"]
