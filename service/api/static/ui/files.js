// Labelled data from files the user picks, as a request body of the fit and evaluate routes.
//
// An .npz archive is sent as it is (application/x-npz: its `logits` or `probabilities` and `labels` arrays,
// the other fields as query parameters), so the service reads and checks it. An .npy or .csv file of scores
// with a labels file (.npy or .csv, one column) is read here and sent as JSON. Checks of shapes, values
// and labels are the service's: its message is what the user sees.

const DTYPES = {
  "<f4": [4, (view, at) => view.getFloat32(at, true)],
  "<f8": [8, (view, at) => view.getFloat64(at, true)],
  "<f2": null,
  "<i8": [8, (view, at) => Number(view.getBigInt64(at, true))],
  "<i4": [4, (view, at) => view.getInt32(at, true)],
  "<i2": [2, (view, at) => view.getInt16(at, true)],
  "|i1": [1, (view, at) => view.getInt8(at)],
  "<u8": [8, (view, at) => Number(view.getBigUint64(at, true))],
  "<u4": [4, (view, at) => view.getUint32(at, true)],
  "<u2": [2, (view, at) => view.getUint16(at, true)],
  "|u1": [1, (view, at) => view.getUint8(at)],
  "|b1": [1, (view, at) => view.getUint8(at)],
};

export class FileError extends Error {}

function suffix(file) {
  const dot = file.name.lastIndexOf(".");
  return dot < 0 ? "" : file.name.slice(dot).toLowerCase();
}

/** An .npy file as {shape, values} (values flat, C order). */
export function parseNpy(buffer, name) {
  const bytes = new Uint8Array(buffer);
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59];
  if (bytes.length < 10 || magic.some((byte, i) => bytes[i] !== byte)) {
    throw new FileError(`${name}: not an .npy file`);
  }
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header);
  const order = /'fortran_order':\s*(True|False)/.exec(header);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !order || !shape) throw new FileError(`${name}: the .npy header cannot be read`);
  if (order[1] === "True") throw new FileError(`${name}: a Fortran-ordered array; save it in C order`);
  const dtype = DTYPES[descr[1]];
  if (!dtype) throw new FileError(`${name}: dtype ${descr[1]} is not supported here; use float32, float64 or int`);
  const dims = shape[1].split(",").map((part) => part.trim()).filter(Boolean).map(Number);
  const count = dims.reduce((a, b) => a * b, 1);
  const [size, read] = dtype;
  const offset = start + headerLength;
  if (offset + count * size > buffer.byteLength) throw new FileError(`${name}: the file is shorter than its shape`);
  const values = new Array(count);
  for (let i = 0; i < count; i += 1) values[i] = read(view, offset + i * size);
  return { shape: dims, values };
}

/** A .csv file of numbers as rows; a first row holding anything that is not a number is a header. */
export function parseCsv(text, name) {
  const lines = text.split(/\r?\n/).filter((line) => line.trim() !== "");
  const rows = lines.map((line) => line.split(",").map((cell) => cell.trim()));
  const numeric = (cell) => cell !== "" && !Number.isNaN(Number(cell));
  if (rows.length && !rows[0].every(numeric)) rows.shift();
  return rows.map((row, i) =>
    row.map((cell) => {
      if (!numeric(cell)) throw new FileError(`${name}: row ${i + 1} holds ${JSON.stringify(cell.slice(0, 20))}, not a number`);
      return Number(cell);
    }),
  );
}

async function matrix(file) {
  if (suffix(file) === ".npy") {
    const { shape, values } = parseNpy(await file.arrayBuffer(), file.name);
    if (shape.length === 1) return values.map((value) => [value]);
    if (shape.length !== 2) throw new FileError(`${file.name}: scores must be a 2-D array, not ${shape.length}-D`);
    const rows = [];
    for (let i = 0; i < shape[0]; i += 1) rows.push(values.slice(i * shape[1], (i + 1) * shape[1]));
    return rows;
  }
  if (suffix(file) === ".csv") return parseCsv(await file.text(), file.name);
  throw new FileError(`${file.name}: scores are read from .npz, .npy or .csv files`);
}

async function vector(file) {
  if (suffix(file) === ".npy") return parseNpy(await file.arrayBuffer(), file.name).values;
  if (suffix(file) === ".csv") {
    return parseCsv(await file.text(), file.name).map((row) => {
      if (row.length !== 1) throw new FileError(`${file.name}: a labels file has one column, not ${row.length}`);
      return row[0];
    });
  }
  throw new FileError(`${file.name}: labels are read from .npy or .csv files`);
}

/** The labelled data of the files: {kind: "npz", bytes} or {kind: "json", object}. */
export async function readLabelled(scoresFile, labelsFile, scoreKind) {
  if (!scoresFile) throw new FileError("choose a scores file (.npz, .npy or .csv)");
  if (suffix(scoresFile) === ".npz") {
    if (labelsFile) throw new FileError(`${scoresFile.name}: an .npz archive holds its labels; leave the labels file empty`);
    return { kind: "npz", bytes: await scoresFile.arrayBuffer(), name: scoresFile.name };
  }
  if (!labelsFile) throw new FileError("choose a labels file (.npy or .csv) for the scores");
  const object = { [scoreKind]: await matrix(scoresFile), labels: await vector(labelsFile) };
  return { kind: "json", object, name: `${scoresFile.name} + ${labelsFile.name}` };
}

/** The request body of the data with the route's other fields: {body, type, query}. */
export function requestBody(data, fields = {}) {
  if (data.kind === "npz") {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(fields)) {
      query.set(key, typeof value === "object" ? JSON.stringify(value) : String(value));
    }
    const text = query.toString();
    return { body: data.bytes, type: "application/x-npz", query: text ? `?${text}` : "" };
  }
  return { body: JSON.stringify({ ...data.object, ...fields }), type: "application/json", query: "" };
}
