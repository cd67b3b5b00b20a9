// One timed answer in transformers.js (Node), as JSON: bench/peers.py's transformers.js peer.
//
//   node peer_timing.mjs REQUEST.json OUT.json
//
// REQUEST: {"bundle": dir, "image": path, "prompt": text, "max_new_tokens": n, "warmup": bool,
//   "threads": n (ONNX Runtime intra-op threads; 0: its default)}
// OUT: token_ids (greedy, new tokens only), load_ms (open the bundle), stages_ms (preprocess:
//   image file + prompt -> inputs; vision: the vision graph; prefill: embed, merge, decoder and
//   the first pick), ttft_ms, decode_ms (first token -> last token), decode_in_graph_ms (inside
//   the decoder session after the first token), peak_rss_kib (VmHWM of this process).
//
//   openBundle ─► (warm-up answer) ─► t0 ─► RawImage.read + processor ─► generate(streamer)
//                 vision_encoder.run (timed) ─► decoder prefill ─► put(first) ... put(last)
// The bundle opens as answer.mjs opens it, with the runtime's preprocessing (preprocess.mjs).
import fs from 'node:fs';
import { LlavaForConditionalGeneration, RawImage } from '@huggingface/transformers';
import { openBundle } from './bundle.mjs';
import { useBundlePreprocessing } from './preprocess.mjs';

const [requestPath, outPath] = process.argv.slice(2);
const req = JSON.parse(fs.readFileSync(requestPath, 'utf8'));

if (req.threads > 0) {
    // openBundle's from_pretrained, with the thread count the other peers get
    const load = LlavaForConditionalGeneration.from_pretrained.bind(LlavaForConditionalGeneration);
    const session_options = { intraOpNumThreads: req.threads, interOpNumThreads: 1 };
    LlavaForConditionalGeneration.from_pretrained = (id, options = {}) => load(id, { ...options, session_options });
}

const tLoad = performance.now();
const { processor, model, vision } = await openBundle(req.bundle);
useBundlePreprocessing(processor, vision);
const loadMs = performance.now() - tLoad;

// Time the vision graph and the decoder session from the outside (wrappers, no library change).
const clock = { vision: 0, decoder: 0 };
const encode = model.encode_image.bind(model);
model.encode_image = async (inputs) => {
    const t = performance.now();
    const out = await encode(inputs);
    clock.vision += performance.now() - t;
    return out;
};
for (const session of Object.values(model.sessions)) {
    if (!session.inputNames.includes('inputs_embeds')) continue; // the decoder only
    const run = session.run.bind(session);
    session.run = async (...args) => {
        const t = performance.now();
        const out = await run(...args);
        clock.decoder += performance.now() - t;
        return out;
    };
}

/** Streams token times: the first put() is the prompt, every later one a new token. */
class TimingStreamer {
    constructor() {
        this.times = [];
        this.prompt = true;
    }
    put() {
        if (this.prompt) this.prompt = false;
        else this.times.push({ t: performance.now(), decoder: clock.decoder });
    }
    end() {}
}

const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: req.prompt }] }];

async function answer() {
    clock.vision = 0;
    clock.decoder = 0;
    const streamer = new TimingStreamer();
    const t0 = performance.now();
    const prompt = processor.apply_chat_template(messages, { add_generation_prompt: true });
    const inputs = await processor(await RawImage.read(req.image), prompt);
    const t1 = performance.now();
    const out = await model.generate({
        ...inputs,
        max_new_tokens: req.max_new_tokens,
        do_sample: false,
        streamer,
    });
    const tokenIds = out.tolist()[0].slice(inputs.input_ids.dims.at(-1)).map(Number);
    const [first, last] = [streamer.times[0], streamer.times.at(-1)];
    return {
        token_ids: tokenIds,
        stages_ms: { preprocess: t1 - t0, vision: clock.vision, prefill: first.t - t1 - clock.vision },
        ttft_ms: first.t - t0,
        decode_ms: last.t - first.t,
        decode_in_graph_ms: last.decoder - first.decoder,
    };
}

if (req.warmup) await answer();
const result = await answer();
const status = fs.readFileSync('/proc/self/status', 'utf8');
const hwm = status.match(/^VmHWM:\s+(\d+)/m);
result.load_ms = loadMs;
result.peak_rss_kib = hwm ? Number(hwm[1]) : null;
fs.writeFileSync(outPath, JSON.stringify(result));
