// The worker thread that applies a big layer's entries while the main thread inflates, hashes
// and parses it (see WorkerSink in unpack.ts).
import { parentPort, workerData } from 'node:worker_threads';
import { serveLayerWorker } from './unpack.js';

serveLayerWorker(parentPort!, workerData as { root: string; layer: string });
