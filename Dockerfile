FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOST=0.0.0.0 PORT=8001
COPY pyproject.toml README.md ./
COPY core core
COPY lua lua
COPY persistence persistence
COPY quota quota
COPY payments payments
COPY reconciler reconciler
COPY hotpath hotpath
COPY ops ops
# One image for every command: serve, reconcile, migrate, report and the operator's CLI
# (docker-compose.yml runs each). Reports are written to /app/reports (REPORT_DIR).
RUN pip install --no-cache-dir . && useradd --system quota \
    && mkdir -p /app/reports && chown quota /app/reports
USER quota
ENV REPORT_DIR=/app/reports
# 8001: the API and /metrics (serve); 9101: a reconciler's metrics (METRICS_PORT=9101)
EXPOSE 8001 9101
# serve's liveness; docker-compose.yml gives the reconciler its own and migrate none.
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/health')"
CMD ["quota-gateway", "serve"]
