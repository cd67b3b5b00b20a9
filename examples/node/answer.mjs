// Answer a question about an image with an svdprune-onnx bundle, in transformers.js (Node).
//
//   npm install --ignore-scripts
//   node answer.mjs BUNDLE IMAGE "What is in the image?" [max_new_tokens]
//
// The bundle folder loads unchanged: its processor expands the image placeholder to exactly K
// image tokens, and the vision graph emits the K kept tokens' features. preprocess.mjs replaces
// transformers.js's image preprocessing (sharp's resize) with the runtime's, so the pruning graph
// sees the device's pixels and keeps the device's tokens.
import { RawImage } from '@huggingface/transformers';
import { openBundle } from './bundle.mjs';
import { useBundlePreprocessing } from './preprocess.mjs';

const [bundleArg, imagePath, question = 'What is in the image?', maxNew = '64'] = process.argv.slice(2);
if (!bundleArg || !imagePath) {
    console.error('usage: node answer.mjs BUNDLE IMAGE ["question"] [max_new_tokens]');
    process.exit(2);
}

const { processor, model, vision } = await openBundle(bundleArg);
useBundlePreprocessing(processor, vision);

const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: question }] }];
const prompt = processor.apply_chat_template(messages, { add_generation_prompt: true });
const inputs = await processor(await RawImage.read(imagePath), prompt);

const t0 = performance.now();
const output = await model.generate({ ...inputs, max_new_tokens: Number(maxNew), do_sample: false });
const newTokens = output.slice(null, [inputs.input_ids.dims.at(-1), null]);
const [answer] = processor.batch_decode(newTokens, { skip_special_tokens: true });
console.log(answer);
console.error(`(${newTokens.dims.at(-1)} tokens in ${(performance.now() - t0).toFixed(0)} ms)`);
