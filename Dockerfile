FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain domain
COPY commands commands
COPY projections projections
COPY queries queries
COPY infra infra
COPY api api
RUN pip install --no-cache-dir .
ENV OBSLEDGER_DATA_DIR=/data
VOLUME /data
EXPOSE 8000
CMD ["obsledger", "serve", "--host", "0.0.0.0", "--port", "8000"]
