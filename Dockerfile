# CPU image serving linrec's default model (shipped in the package, models/default/) on port 8000:
#   docker build -t linrec . && docker run --rm -p 8000:8000 linrec
# Another model: mount it and name it, e.g. `docker run -v /models/m:/model linrec linrec serve /model --host 0.0.0.0`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and exactly, from PyTorch's CPU index: PyPI's build would bring gigabytes of CUDA.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The repository root is the `linrec` package (see pyproject.toml's package-dir).
COPY . /app
RUN pip install /app

RUN useradd --create-home --uid 10001 linrec
USER linrec
ENV LINREC_CACHE_DIR=/home/linrec/.cache/linrec
# Fails the build if the installed package lacks its default model.
RUN python -c "from linrec.models.demo import default_model_path; print(default_model_path())"

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# SIGTERM (docker stop) drains in-flight requests for up to --drain-timeout seconds; give docker stop longer.
STOPSIGNAL SIGTERM
CMD ["linrec", "serve", "--host", "0.0.0.0", "--port", "8000"]
