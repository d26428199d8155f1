# One image for every streamrec process (param-server, train-online, serve, refit, replay, ...).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# CPU-only torch first: an unpinned torch would pull a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY streamrec ./streamrec
RUN pip install '.[fast]'
ENV STREAMREC_HOME=/data
VOLUME ["/data"]
ENTRYPOINT ["streamrec"]
CMD ["--help"]
