// Answers from an aira-opt export folder with onnxruntime-node: no Python, only the folder. The loop, the prompt
// format and the injection-safe tokenization are the chat page's own module (aira_opt/web/page/aira-loop.mjs).
//   ONNXRUNTIME_NODE_INSTALL=skip npm install      (the CPU binaries ship inside the npm package)
//   node index.mjs ../../export/aira-tiny/fp32 "What is the capital of Brazil?" [--max-new-tokens 32] [--sample] [--json]
import { readFileSync } from "node:fs";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { Tokenizer } from "@huggingface/tokenizers";
import { GREEDY, decodeAnswer, describeExport, generate, promptIds } from "../../aira_opt/web/page/aira-loop.mjs";

const args = process.argv.slice(2);
const valued = ["--max-new-tokens", "--seed"];
const option = (name, fallback) => (args.includes(name) ? args[args.indexOf(name) + 1] : fallback);
const [folder, question] = args.filter((a, i) => !a.startsWith("--") && !(i > 0 && valued.includes(args[i - 1])));
if (!folder || question === undefined) {
  console.error("usage: node index.mjs EXPORT_DIR QUESTION [--max-new-tokens N] [--sample] [--seed N] [--json]");
  process.exit(2);
}

// The folder describes itself: shapes from genai_config.json, the prompt format, stop ids and generation defaults
// from generation_config.json.
const readJson = (name) => JSON.parse(readFileSync(join(folder, name), "utf8"));
const generationConfig = readJson("generation_config.json");
const model = describeExport({ genaiConfig: readJson("genai_config.json"), generationConfig });
const tokenizer = new Tokenizer(readJson("tokenizer.json"), readJson("tokenizer_config.json"));
const session = await ort.InferenceSession.create(join(folder, "model.onnx"));
const kvType = session.inputMetadata?.find?.((m) => m.name === "past_key_values.0.key")?.type ?? "float32";

const ids = promptIds(tokenizer, model.format, question);
const tokens = [];
for await (const { token } of generate({
  ort, session, shapes: model, promptIds: ids, kvType,
  settings: args.includes("--sample") ? model.defaults : GREEDY,
  seed: Number(option("--seed", "0")),
  maxNewTokens: Number(option("--max-new-tokens", "64")),
  stopIds: model.format.stop_ids,
})) {
  tokens.push(token);
}
const answer = decodeAnswer(tokenizer, tokens);
console.log(args.includes("--json") ? JSON.stringify({ prompt_ids: ids, tokens, answer }) : answer);
