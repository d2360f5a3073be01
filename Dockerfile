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
RUN pip install --no-cache-dir . && useradd --system quota
USER quota
EXPOSE 8001
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/health')"
CMD ["quota-gateway", "serve"]
