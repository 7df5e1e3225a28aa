#!/usr/bin/env bash
# The main job on the embedded CPU default: the FacTool claim-verification pipeline with a
# real small LM (Gemma 3 270M on llama.cpp), streaming BM25 and MiniLM MaxSim reranking.
# Starts `alto serve`, sends SQuAD questions through the CLI and the HTTP ingress, prints
# the answers, claims and evidence as they stream back, then stops the server.
#   ./run.sh                 # 3 questions
#   QUESTIONS=5 ./run.sh
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
export ALTO_RUN_DIR=${ALTO_RUN_DIR:-$PWD/.alto-run}
PORT=${PORT:-8470}
.venv/bin/alto serve configs/factool.toml --deploy configs/factool.cpu.toml --http "127.0.0.1:$PORT" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  [ -f "$ALTO_RUN_DIR/factool.json" ] && break
  kill -0 $SERVER 2>/dev/null || { echo "alto serve exited" >&2; exit 1; }
  sleep 1
done
echo
echo "== SQuAD questions through the CLI (alto submit --squad), results as they stream:"
.venv/bin/alto submit factool --squad "${QUESTIONS:-3}" --pretty
echo
echo "== one question through the HTTP ingress (SSE):"
curl -sN -X POST "http://127.0.0.1:$PORT/v1/pipelines/factool/requests" \
  -H 'Content-Type: application/json' \
  -d '{"id": "http-1", "question": "Where did Super Bowl 50 take place?"}' | cut -c1-220
echo
echo "== alto status:"
.venv/bin/alto status --url "http://127.0.0.1:$PORT"
