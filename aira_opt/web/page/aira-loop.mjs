// aira-opt's generation loop in JavaScript: one module for every JavaScript runtime. The chat page runs it over
// onnxruntime-web, examples/node over onnxruntime-node; the caller passes its `ort` and its tokenizer, so this
// module imports nothing and runs wherever ES modules do. It mirrors the Python loop (aira_opt/generation):
// the export's prompt format with injection-safe tokenization, a KV cache that owns its update, and next-token
// selection with transformers' semantics (repetition penalty, then temperature -> top-k -> top-p).

const QUESTION = "{question}";

// ---- The folder's description -------------------------------------------------------------------------------

/** Shapes, prompt format and generation defaults, from the files every export carries. */
export function describeExport({ genaiConfig, generationConfig }) {
  const decoder = genaiConfig.model.decoder;
  const format = generationConfig.prompt_format;
  if (!format || !format.template?.includes(QUESTION)) {
    throw new Error("generation_config.json has no prompt_format: is this an aira-opt export folder?");
  }
  return {
    layers: decoder.num_hidden_layers, // past_key_values.{0..layers-1}.{key,value}
    kvHeads: decoder.num_key_value_heads,
    headDim: decoder.head_size,
    format, // {kind, template, stop_ids, pad_id}
    defaults: samplingSettings(generationConfig),
  };
}

// ---- Tokenization: control tokens come from the template only ----------------------------------------------

/** Ids of plain text: special-token strings inside it are ordinary text, as the Python loop's `text_ids`
 * (tokenizers' encode_special_tokens). Added tokens that are not special still match, as they do there. */
export function textIds(tokenizer, text) {
  if (!text) return [];
  const ordinary = tokenizer.added_tokens.filter((t) => !t.special).map((t) => t.content);
  const sections = ordinary.length ? splitOn(text, ordinary) : [text];
  const ids = [];
  sections.forEach((section, index) => {
    const added = tokenizer.added_tokens_map.get(section);
    if (added && !added.special) {
      ids.push(added.id);
      return;
    }
    const normalized = tokenizer.normalizer ? tokenizer.normalizer(section) : section;
    const words = tokenizer.pre_tokenizer ? tokenizer.pre_tokenizer(normalized, { section_index: index }) : [normalized];
    for (const token of tokenizer.model(words)) {
      ids.push(tokenizer.model.tokens_to_ids.get(token) ?? tokenizer.model.unk_token_id);
    }
  });
  return ids;
}

function splitOn(text, tokens) {
  const escaped = [...tokens].sort((a, b) => b.length - a.length).map((t) => t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  return text.split(new RegExp(`(${escaped.join("|")})`)).filter((s) => s.length > 0);
}

/** A template part, with its control tokens matched as such (and no bos added). */
function templateIds(tokenizer, part) {
  return part ? tokenizer.encode(part, { add_special_tokens: false }).ids : [];
}

function textAfterLastControlToken(tokenizer, part) {
  let end = 0;
  for (const token of tokenizer.added_tokens) {
    if (token.special && part.includes(token.content)) end = Math.max(end, part.lastIndexOf(token.content) + token.content.length);
  }
  return part.slice(end);
}

/** The user's text as the tokenizer splits it right after the template's plain lead (`user\n`, say). */
function continuationIds(tokenizer, lead, text) {
  if (lead) {
    const alone = textIds(tokenizer, lead);
    const joint = textIds(tokenizer, lead + text);
    if (alone.every((id, i) => joint[i] === id)) return joint.slice(alone.length);
  }
  return textIds(tokenizer, text);
}

/** The ids the model expects before its answer: the template's parts as control tokens, the question as text. */
export function promptIds(tokenizer, format, question) {
  const at = format.template.indexOf(QUESTION);
  const before = format.template.slice(0, at);
  const after = format.template.slice(at + QUESTION.length);
  const lead = textAfterLastControlToken(tokenizer, before);
  return [...templateIds(tokenizer, before), ...continuationIds(tokenizer, lead, question), ...templateIds(tokenizer, after)];
}

/** Answer text from generated ids, without control tokens. */
export function decodeAnswer(tokenizer, ids) {
  return ids.length ? tokenizer.decode(ids, { skip_special_tokens: true }).trim() : "";
}

// ---- The KV cache ---------------------------------------------------------------------------------------------

/** The past of one sequence: the graph returns present.{i}.{key,value} ([1, kvHeads, past + S, headDim]), which
 * become the next step's past_key_values.{i}.{key,value}. */
export class KVCache {
  constructor(ort, { layers, kvHeads, headDim }, dtype = "float32") {
    this.length = 0; // positions held
    this.tensors = {};
    const Data = dtype === "float16" ? Uint16Array : Float32Array;
    for (let i = 0; i < layers; i++) {
      for (const kind of ["key", "value"]) {
        this.tensors[`past_key_values.${i}.${kind}`] = new ort.Tensor(dtype, new Data(0), [1, kvHeads, 0, headDim]);
      }
    }
  }

  update(outputs, newPositions) {
    for (const name of Object.keys(this.tensors)) {
      this.tensors[name] = outputs[name.replace("past_key_values.", "present.")];
    }
    this.length += newPositions;
  }
}

// ---- Next-token selection ---------------------------------------------------------------------------------

/** Sampling settings from a generation config (the export's defaults), with the user's overrides. */
export function samplingSettings(generationConfig, overrides = {}) {
  const pick = (name, fallback) => overrides[name] ?? generationConfig[name] ?? fallback;
  const greedy = overrides.greedy ?? false;
  return {
    doSample: !greedy && Boolean(pick("do_sample", false)),
    temperature: Number(pick("temperature", 1.0)),
    topK: Number(pick("top_k", 0)),
    topP: Number(pick("top_p", 1.0)),
    repetitionPenalty: Number(pick("repetition_penalty", 1.0)),
  };
}

/** Raw argmax, the settings parity checks compare. */
export const GREEDY = { doSample: false, temperature: 1, topK: 0, topP: 1, repetitionPenalty: 1 };

/** A seeded uniform generator in [0, 1) (mulberry32): a seed repeats a sampled answer in this loop. */
export function seededRandom(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The next token from one position's logits [V]: repetition penalty over the history (prompt included), then
 * argmax, or temperature -> top-k (ties with the k-th stay) -> top-p (the smallest set whose probability
 * exceeds top_p, at least one token) -> a draw. */
export function selectNext(logits, history, settings, random) {
  if (!settings.doSample && settings.repetitionPenalty === 1) return argmax(logits);
  const scores = Float32Array.from(logits);
  if (settings.repetitionPenalty !== 1) {
    for (const id of new Set(history)) {
      const s = logits[id];
      scores[id] = s < 0 ? s * settings.repetitionPenalty : s / settings.repetitionPenalty;
    }
  }
  if (!settings.doSample) return argmax(scores);
  // Candidates: every token when top-k is off, else those at or above the k-th largest score.
  let candidates = Array.from(scores.keys());
  if (settings.topK > 0 && settings.topK < scores.length) {
    const kth = kthLargest(scores, settings.topK);
    candidates = candidates.filter((i) => scores[i] >= kth);
  }
  candidates.sort((a, b) => scores[a] - scores[b] || a - b); // ascending, stable by id
  const top = scores[candidates[candidates.length - 1]] / settings.temperature;
  let probs = candidates.map((i) => Math.exp(scores[i] / settings.temperature - top));
  const total = probs.reduce((a, b) => a + b, 0);
  probs = probs.map((p) => p / total);
  let first = 0; // ascending: drop the tail whose cumulative probability is <= 1 - top_p
  if (settings.topP < 1) {
    let cumulative = 0;
    while (first < candidates.length - 1 && (cumulative += probs[first]) <= 1 - settings.topP) first++;
  }
  const kept = probs.slice(first);
  const mass = kept.reduce((a, b) => a + b, 0);
  let u = random() * mass;
  for (let j = 0; j < kept.length; j++) {
    if ((u -= kept[j]) < 0) return candidates[first + j];
  }
  return candidates[candidates.length - 1];
}

function argmax(values) {
  let best = 0;
  for (let v = 1; v < values.length; v++) if (values[v] > values[best]) best = v;
  return best;
}

function kthLargest(values, k) {
  const top = []; // ascending, at most k long
  for (const v of values) {
    if (top.length < k) {
      top.splice(lowerBound(top, v), 0, v);
    } else if (v > top[0]) {
      top.shift();
      top.splice(lowerBound(top, v), 0, v);
    }
  }
  return top[0];
}

function lowerBound(sorted, v) {
  let lo = 0, hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid] < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// ---- The loop ---------------------------------------------------------------------------------------------

const int64 = (ort, values, dims) => new ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);
const ones = (ort, n) => new ort.Tensor("int64", new BigInt64Array(n).fill(1n), [1, n]);

/** Generate from prompt ids, one token at a time: prefill the prompt, then decode one position per step until a
 * stop id or `maxNewTokens`. Yields {token, seconds, runSeconds}: seconds since the start (the first is the time
 * to the first token), and how many of them were spent inside ONNX Runtime (the rest is this loop's own work).
 * `ignoreStop` keeps going past stop ids (for timing a fixed number of tokens). */
export async function* generate({ ort, session, shapes, promptIds: prompt, settings, maxNewTokens, stopIds,
                                  seed = 0, kvType = "float32", ignoreStop = false, now = () => performance.now() }) {
  const start = now();
  const cache = new KVCache(ort, shapes, kvType);
  const random = seededRandom(seed);
  const history = [...prompt];
  let stepIds = prompt;
  let runSeconds = 0;
  for (let step = 0; step < maxNewTokens; step++) {
    const total = cache.length + stepIds.length;
    // input_ids, position_ids: [1, S]; attention_mask: [1, past + S]
    const feeds = {
      input_ids: int64(ort, stepIds, [1, stepIds.length]),
      attention_mask: ones(ort, total),
      position_ids: int64(ort, stepIds.map((_, i) => cache.length + i), [1, stepIds.length]),
      ...cache.tensors,
    };
    const before = now();
    const outputs = await session.run(feeds);
    runSeconds += (now() - before) / 1000;
    const [, seq, vocab] = outputs.logits.dims; // logits: [1, S, V] -> the last position's [V]
    const token = selectNext(outputs.logits.data.subarray((seq - 1) * vocab, seq * vocab), history, settings, random);
    cache.update(outputs, stepIds.length);
    history.push(token);
    yield { token, seconds: (now() - start) / 1000, runSeconds };
    if (!ignoreStop && stopIds.includes(token)) return;
    stepIds = [token];
  }
}
