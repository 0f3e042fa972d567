// Greedy generation from an aira-opt export folder with onnxruntime-node: no Python, only the folder.
//   ONNXRUNTIME_NODE_INSTALL=skip npm install      (the CPU binaries ship inside the npm package)
//   node index.mjs ../../export/aira-tiny/fp32 "What is the capital of Brazil?" [--max-new-tokens 32] [--json]
import { readFileSync } from "node:fs";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { Tokenizer } from "@huggingface/tokenizers";

const args = process.argv.slice(2);
const flag = (name) => args.includes(name);
const option = (name, fallback) => (args.includes(name) ? args[args.indexOf(name) + 1] : fallback);
const [folder, question] = args.filter((a, i) => !a.startsWith("--") && !(i > 0 && args[i - 1] === "--max-new-tokens"));
if (!folder || !question) {
  console.error("usage: node index.mjs EXPORT_DIR QUESTION [--max-new-tokens N] [--json]");
  process.exit(2);
}
const maxNewTokens = Number(option("--max-new-tokens", "64"));

// The folder describes itself: shapes from genai_config.json; the prompt format, stop ids and pad id that the
// export recorded in generation_config.json (Aira's template, the model's chat template, or plain text).
const readJson = (name) => JSON.parse(readFileSync(join(folder, name), "utf8"));
const genai = readJson("genai_config.json").model;
const { num_hidden_layers: layers, num_key_value_heads: kvHeads, head_size: headDim } = genai.decoder;
const format = readJson("generation_config.json").prompt_format;
const tokenizer = new Tokenizer(readJson("tokenizer.json"), readJson("tokenizer_config.json"));

// The template's parts are tokenized with their control tokens; the question as plain text.
const [before, after] = format.template.split("{question}");
const encode = (text) => (text ? tokenizer.encode(text, { add_special_tokens: false }).ids : []);
const promptIds = [...encode(before), ...encode(question), ...encode(after)];
const session = await ort.InferenceSession.create(join(folder, "model.onnx"));
const kvType = session.inputMetadata
  ? (session.inputMetadata.find?.((m) => m.name === "past_key_values.0.key")?.type ?? "float32")
  : "float32";

const int64 = (values, dims) => new ort.Tensor("int64", BigInt64Array.from(values.map(BigInt)), dims);
const emptyPast = () => {
  const past = {};
  for (let i = 0; i < layers; i++) {
    for (const kind of ["key", "value"]) {
      const data = kvType === "float16" ? new Uint16Array(0) : new Float32Array(0);
      past[`past_key_values.${i}.${kind}`] = new ort.Tensor(kvType, data, [1, kvHeads, 0, headDim]);
    }
  }
  return past;
};

let past = emptyPast();
let stepIds = promptIds;
let total = 0; // past length
const generated = [];
for (let step = 0; step < maxNewTokens; step++) {
  // input_ids, position_ids: [1, S]; attention_mask: [1, past + S]
  const feeds = {
    input_ids: int64(stepIds, [1, stepIds.length]),
    attention_mask: int64(new Array(total + stepIds.length).fill(1), [1, total + stepIds.length]),
    position_ids: int64(stepIds.map((_, i) => total + i), [1, stepIds.length]),
    ...past,
  };
  const out = await session.run(feeds);
  const [, seq, vocab] = out.logits.dims;
  const last = out.logits.data.subarray((seq - 1) * vocab, seq * vocab); // logits: [1, S, V] -> [V]
  let best = 0;
  for (let v = 1; v < vocab; v++) if (last[v] > last[best]) best = v;
  generated.push(best);
  if (format.stop_ids.includes(best)) break;
  past = {};
  for (let i = 0; i < layers; i++) {
    past[`past_key_values.${i}.key`] = out[`present.${i}.key`];
    past[`past_key_values.${i}.value`] = out[`present.${i}.value`];
  }
  total += stepIds.length;
  stepIds = [best];
}
const answer = tokenizer.decode(generated, { skip_special_tokens: true }).trim();
console.log(flag("--json") ? JSON.stringify({ prompt_ids: promptIds, tokens: generated, answer }) : answer);
