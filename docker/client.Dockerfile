# Hospital SuperNode: Flower's official SuperNode image + fedseg's site part (common/ and client/
# only: the coordinator's server/ and the simulation tools are never shipped to a hospital).
# Site data, site state and credentials are mounted at run time; none is baked into the image.
# Build from the repository root: docker build -f docker/client.Dockerfile -t fedseg-client .
FROM flwr/supernode:1.42.0

USER root
# Mount points owned by the non-root user, so named volumes start writable by it.
RUN mkdir -p /data /state && chown app:app /data /state && chmod 700 /state
WORKDIR /app
COPY --chown=app:app setup.py pyproject.toml README.md ./
COPY --chown=app:app common ./common
COPY --chown=app:app client ./client
RUN python -m pip install --no-cache-dir .

USER app
VOLUME ["/data", "/state"]
ENTRYPOINT ["flower-supernode"]
