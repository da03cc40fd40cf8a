# One image for every role: `broker edge` (the default), `broker worker`, `broker mock-llm`.
#   docker build -t sse-broker .
#   docker run --rm -p 8000:8000 -e REDIS_URL=redis://host:6379/0 sse-broker
#   docker run --rm -e REDIS_URL=... -e OPENAI_API_KEY=... sse-broker worker
# docker-compose.yml runs the whole stack; docs/deployment.md explains it.
# No `# syntax=` line: with one, BuildKit fetches that Dockerfile frontend from a registry on
# every build, which fails where no registry is reachable; the built-in one reads this file.

# Build stage: turns the source into a wheel with a pinned build backend.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN pip install --no-cache-dir setuptools==84.2.1
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY worker ./worker
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

# Runtime stage: the pinned runtime dependencies, the wheel, a non-root user.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BROKER_HOST=0.0.0.0 \
    BROKER_PORT=8000
WORKDIR /app
# Dependencies first (their layer is cached until the lock changes), then the project alone.
COPY deploy/requirements.lock ./requirements.lock
RUN pip install --no-cache-dir -r requirements.lock
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 broker \
    && useradd --system --uid 10001 --gid broker --no-create-home --shell /usr/sbin/nologin broker
COPY deploy/healthcheck.py ./healthcheck.py
USER 10001:10001
EXPOSE 8000
# GET /healthz on $BROKER_PORT (the worker and the mock LLM override this in docker-compose.yml).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "/app/healthcheck.py", "--path", "/healthz"]
ENTRYPOINT ["broker"]
CMD ["edge"]
