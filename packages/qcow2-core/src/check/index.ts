export { checkQcow2Image, type Qcow2CheckTarget } from './check.js';
export { Qcow2RebuildNeededError, repairQcow2Image } from './repair.js';
export type { RepairMode } from './repair-refcounts.js';
export { checkResultToQemuJson, checkVerdictExitCode, formatCheckResultHuman } from './report.js';
export type { Qcow2CheckOptions, Qcow2CheckResult } from './types.js';
