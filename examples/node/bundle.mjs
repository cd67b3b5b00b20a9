// Open an svdprune-onnx bundle folder with transformers.js, local files only: its processor,
// its model and the manifest's vision section (what preprocess.mjs reads). Shared by the scripts.
import fs from 'node:fs';
import path from 'node:path';
import { env, AutoProcessor, LlavaForConditionalGeneration } from '@huggingface/transformers';

export async function openBundle(dir) {
    const bundle = path.resolve(dir);
    // The model id is the bundle's folder name under env.localModelPath; never a hub download.
    env.localModelPath = path.dirname(bundle) + path.sep;
    env.allowRemoteModels = false;
    const id = path.basename(bundle);
    const { vision } = JSON.parse(fs.readFileSync(path.join(bundle, 'svdprune.json'), 'utf8'));
    const processor = await AutoProcessor.from_pretrained(id);
    const model = await LlavaForConditionalGeneration.from_pretrained(id); // dtype from config.json
    return { bundle, processor, model, vision };
}
