// The chat page: one export folder (or several) served by `aira-opt web`, answered by our loop over
// onnxruntime-web or by transformers.js's pipeline on the same files. Both get the same prompt ids, made by
// aira-loop.mjs (the export's prompt format; the user's text never becomes control tokens). `window.aira.ask`
// is the same path the form takes, for tests and benchmarks.
import * as ort from "onnxruntime-web/webgpu";
import { Tokenizer } from "@huggingface/tokenizers";
import { GREEDY, decodeAnswer, describeExport, generate, promptIds, samplingSettings } from "./aira-loop.mjs";

const getJson = async (url) => {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${response.statusText}`);
  return response.json();
};

const params = new URLSearchParams(location.search);
const index = await getJson("/models/index.json");
const threads = Number(params.get("threads") ?? index.threads);
// Before transformers.js loads: it points ONNX Runtime at a CDN unless wasmPaths is already set.
ort.env.wasm.wasmPaths = new URL("/vendor/onnxruntime-web/dist/", location.href).href;
ort.env.wasm.numThreads = threads;

/** A file's bytes, reporting (file, loaded bytes, total bytes) as they arrive. */
async function download(url, onProgress) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${response.statusText}`);
  const total = Number(response.headers.get("Content-Length"));
  if (!(total > 0) || !response.body) return new Uint8Array(await response.arrayBuffer());
  const bytes = new Uint8Array(total);
  const reader = response.body.getReader();
  for (let loaded = 0; ;) {
    const { done, value } = await reader.read();
    if (done) return bytes;
    bytes.set(value, loaded);
    loaded += value.length;
    onProgress(url.split("/").slice(3).join("/"), loaded, total);
  }
}

/** A model opened in one runtime: `run(ids, options, onToken)` generates and reports each token as it comes. */
async function openAiraLoop(model, tokenizer, description, onProgress) {
  const base = `/models/${model.name}/`;
  const options = { executionProviders: ["wasm"], logSeverityLevel: 3 }; // errors only, as transformers.js
  if (model.external_data) {
    const data = `${model.graph}_data`;
    options.externalData = [{ path: data.split("/").pop(), data: await download(base + data, onProgress) }];
  }
  const session = await ort.InferenceSession.create(await download(base + model.graph, onProgress), options);
  const kvType = session.inputMetadata?.find?.((m) => m.name === "past_key_values.0.key")?.type ?? "float32";
  return {
    async run(ids, { settings, maxNewTokens, ignoreStop, seed }, onToken) {
      for await (const { token, seconds, runSeconds } of generate({
        ort, session, shapes: description, promptIds: ids, settings, maxNewTokens, ignoreStop, seed, kvType,
        stopIds: description.format.stop_ids,
      })) {
        onToken(token, seconds, runSeconds);
      }
    },
  };
}

async function openTransformersJs(model, tokenizer, description, onProgress) {
  const transformers = await import("@huggingface/transformers");
  Object.assign(transformers.env, {
    allowRemoteModels: false, allowLocalModels: true, useBrowserCache: false,
    localModelPath: new URL("/models/", location.href).href,
  });
  const generator = await transformers.pipeline("text-generation", model.name, {
    dtype: model.dtype, device: "wasm",
    progress_callback: (p) => p.status === "progress" && onProgress(`${model.name}/${p.file}`, p.loaded, p.total),
  });
  return {
    // The pipeline's own model generates from our ids: its text path would match control-token strings in the
    // user's text.
    async run(ids, { settings, maxNewTokens, ignoreStop }, onToken) {
      const start = performance.now();
      let prompt = true;
      const streamer = {
        put(value) {
          if (prompt) { prompt = false; return; } // the first call carries the prompt
          onToken(Number(value[0][0]), (performance.now() - start) / 1000);
        },
        end() {},
      };
      await generator.model.generate({
        inputs: new transformers.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, ids.length]),
        attention_mask: new transformers.Tensor("int64", new BigInt64Array(ids.length).fill(1n), [1, ids.length]),
        max_new_tokens: maxNewTokens, min_new_tokens: ignoreStop ? maxNewTokens : null,
        do_sample: settings.doSample, temperature: settings.temperature, top_k: settings.topK, top_p: settings.topP,
        repetition_penalty: settings.repetitionPenalty, streamer,
      });
    },
  };
}

const RUNTIMES = { aira: openAiraLoop, transformers: openTransformersJs };
const opened = new Map(); // `${runtime}:${model}` -> a runtime's model
const described = new Map(); // model name -> {tokenizer, description, generationConfig}

async function describe(model) {
  if (!described.has(model.name)) {
    const base = `/models/${model.name}/`;
    const [genaiConfig, generationConfig, tokenizerJson, tokenizerConfig] = await Promise.all(
      ["genai_config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"].map((f) => getJson(base + f)));
    described.set(model.name, {
      tokenizer: new Tokenizer(tokenizerJson, tokenizerConfig),
      description: describeExport({ genaiConfig, generationConfig }),
      generationConfig,
    });
  }
  return described.get(model.name);
}

/** Answer one question. Options: runtime ('aira' | 'transformers'), model (a name from /models/index.json),
 * greedy (argmax with the export's repetition penalty), raw (argmax of the raw logits: what parity compares),
 * maxNewTokens, ignoreStop (time a fixed number of tokens), seed, onToken(tokens, text, seconds) as tokens come,
 * onProgress(file, loaded, total) while a model downloads. */
async function ask(question, { runtime = "aira", model = index.models[0].name, greedy = false, raw = false,
                               maxNewTokens, ignoreStop = false, seed = 0, onToken = null,
                               onProgress = () => {} } = {}) {
  const record = index.models.find((m) => m.name === model);
  if (!record) throw new Error(`no model named ${model}`);
  const { tokenizer, description, generationConfig } = await describe(record);
  const key = `${runtime}:${model}`;
  let loadSeconds = 0;
  if (!opened.has(key)) {
    const start = performance.now();
    opened.set(key, await RUNTIMES[runtime](record, tokenizer, description, onProgress));
    loadSeconds = (performance.now() - start) / 1000;
  }
  const ids = promptIds(tokenizer, description.format, question);
  const settings = raw ? GREEDY : samplingSettings(generationConfig, { greedy });
  const tokens = [], times = [], runTimes = [];
  await opened.get(key).run(ids, { settings, maxNewTokens: maxNewTokens ?? generationConfig.max_new_tokens ?? 200,
                                  ignoreStop, seed }, (token, seconds, runSeconds) => {
    tokens.push(token);
    times.push(seconds);
    runTimes.push(runSeconds);
    if (onToken) onToken(tokens, decodeAnswer(tokenizer, tokens), seconds);
  });
  const decodeSeconds = times.length > 1 ? times.at(-1) - times[0] : NaN;
  return {
    runtime, model, threads, promptIds: ids, tokens, answer: decodeAnswer(tokenizer, tokens), loadSeconds,
    timeToFirstToken: times[0], decodeTokensPerSecond: (times.length - 1) / decodeSeconds,
    // Our loop only: the share of decode time spent inside ONNX Runtime's session.run (the rest is the loop's).
    decodeRunShare: runTimes[0] === undefined ? null : (runTimes.at(-1) - runTimes[0]) / decodeSeconds,
  };
}

// ---- The page --------------------------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const log = $("log"), status = $("status");

function turn(kind, text) {
  const div = document.createElement("div");
  div.className = `turn ${kind}`;
  div.textContent = text; // text, never markup
  log.append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

for (const m of index.models) $("model").append(new Option(`${m.source_model} · ${m.precision}`, m.name));
$("threads").textContent = `${threads} thread${threads > 1 ? "s" : ""}${crossOriginIsolated ? " (isolated)" : ""}`;

$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  $("send").disabled = true;
  $("question").value = "";
  turn("user", question);
  const answer = turn("model", "…");
  const runtime = $("runtime").value;
  status.textContent = `${runtime === "aira" ? "aira-opt loop" : "transformers.js"}: loading…`;
  try {
    const result = await ask(question, {
      runtime, model: $("model").value, greedy: $("greedy").checked, maxNewTokens: Number($("max-new-tokens").value),
      seed: crypto.getRandomValues(new Uint32Array(1))[0], // a new sample each time; window.aira.ask takes a seed
      onProgress: (file, loaded, total) => {
        status.textContent = `loading ${file}: ${(100 * loaded / total).toFixed(0)}% of ${(total / 1e6).toFixed(1)} MB`;
      },
      onToken: (tokens, text, seconds) => {
        answer.textContent = text || "…";
        status.textContent = `${tokens.length} tokens · ${(tokens.length / seconds).toFixed(1)} tok/s`;
      },
    });
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `${result.model} · ${result.runtime === "aira" ? "aira-opt loop" : "transformers.js"} · ` +
      `${result.tokens.length} ` +
      `tokens · first token ${(result.timeToFirstToken * 1000).toFixed(0)} ms · ` +
      `${result.decodeTokensPerSecond.toFixed(1)} tok/s decode`;
    answer.append(meta);
    status.textContent = "ready";
  } catch (error) {
    answer.textContent = `error: ${error.message}`;
    status.textContent = "error";
  } finally {
    $("send").disabled = false;
  }
});

window.aira = { index, threads, ask };
$("send").disabled = false;
status.textContent = "ready";
document.body.dataset.ready = "true";
