"""The bundle's README.md: how an app on the bundle's platform opens the .ort and feeds it.

Generated from the manifest, so names, dtypes, shapes, the EP and the libraries to register are
the bundle's own.  Kotlin uses ORT's Java API (onnxruntime-android), Swift the Objective-C API
(onnxruntime-objc), C++ the C++ API; the extensions library is onnxruntime-extensions' package
for that platform.  These are text: nothing here compiles them.
"""

from __future__ import annotations

_KOTLIN_TYPES = {"tensor(float)": ("FloatBuffer", "Float"), "tensor(int64)": ("LongBuffer", "Long"), "tensor(int32)": ("IntBuffer", "Int"), "tensor(uint8)": ("ByteBuffer", "Byte")}
_SWIFT_TYPES = {"tensor(float)": ".float", "tensor(int64)": ".int64", "tensor(int32)": ".int32", "tensor(uint8)": ".uInt8"}
_CPP_TYPES = {"tensor(float)": "float", "tensor(int64)": "int64_t", "tensor(int32)": "int32_t", "tensor(uint8)": "uint8_t"}
_EP_KOTLIN = {"NnapiExecutionProvider": "options.addNnapi()", "CoreMLExecutionProvider": None, "XnnpackExecutionProvider": 'options.addXnnpack(mapOf("intra_op_num_threads" to "2"))'}
_EP_SWIFT = {"CoreMLExecutionProvider": "try options.appendCoreMLExecutionProvider(with: ORTCoreMLExecutionProviderOptions())", "XnnpackExecutionProvider": "try options.appendXnnpackExecutionProvider(with: ORTXnnpackExecutionProviderOptions())"}
_EP_CPP = {"XnnpackExecutionProvider": 'options.AppendExecutionProvider("XNNPACK", {{"intra_op_num_threads", "2"}});', "NnapiExecutionProvider": None}


def _encoded(v) -> bool:
    """An encoded-image input (``--with-preprocessing`` on an image classifier): the file's bytes, 1-D uint8."""
    return v["dtype"] == "tensor(uint8)" and len(v["shape"]) == 1 and not isinstance(v["shape"][0], int)


def _shape(v) -> list:
    return [d if isinstance(d, int) else 1 for d in v["shape"]]  # a dynamic dim: the app picks the size; 1 shown


def _kotlin(model: dict, ep: str, runtime_opt: bool, extensions: bool) -> str:
    lines = ["import ai.onnxruntime.*", "import java.nio.*", "", "val env = OrtEnvironment.getEnvironment()",
             "val options = OrtSession.SessionOptions()"]
    if _EP_KOTLIN.get(ep):
        lines.append(_EP_KOTLIN[ep])
    if extensions:
        lines.append("options.registerCustomOpLibrary(ai.onnxruntime.extensions.OrtxPackage.getLibraryPath())  // onnxruntime-extensions-android")
    if runtime_opt:
        lines.append('options.addConfigEntry("session.enable_saved_runtime_optimizations", "1")')
    lines.append(f'val session = env.createSession(context.assets.open("{model["file"]}").readBytes(), options)')
    feeds = []
    for v in model["inputs"]:
        var = _var(v["name"])
        if v["dtype"] == "tensor(string)":
            lines.append(f'val {var} = OnnxTensor.createTensor(env, arrayOf("a sentence to embed"), longArrayOf({", ".join(map(str, _shape(v)))}))')
        elif _encoded(v):
            lines.append(f'val {var}Bytes = context.assets.open("photo.jpg").readBytes()  // JPEG or PNG file bytes')
            lines.append(f"val {var} = OnnxTensor.createTensor(env, ByteBuffer.wrap({var}Bytes), longArrayOf({var}Bytes.size.toLong()), OnnxJavaType.UINT8)")
        else:
            buf, _ = _KOTLIN_TYPES.get(v["dtype"], ("FloatBuffer", "Float"))
            shape = _shape(v)
            lines.append(f"val {var} = OnnxTensor.createTensor(env, {buf}.allocate({_prod(shape)}), longArrayOf({', '.join(map(str, shape))}))  // {v['dtype']} {v['shape']}")
        feeds.append(f'"{v["name"]}" to {var}')
    lines.append(f"session.run(mapOf({', '.join(feeds)})).use {{ result ->")
    for i, v in enumerate(model["outputs"]):
        lines.append(f'    val {_var(v["name"])} = result.get("{v["name"]}").get() as OnnxTensor  // {v["dtype"]} {v["shape"]}')
    lines.append("}")
    return "\n".join(lines)


def _swift(model: dict, ep: str, runtime_opt: bool, extensions: bool) -> str:
    lines = ["import onnxruntime_objc", "", "let env = try ORTEnv(loggingLevel: .warning)", "let options = try ORTSessionOptions()"]
    if _EP_SWIFT.get(ep):
        lines.append(_EP_SWIFT[ep])
    if extensions:
        lines.append("try options.registerCustomOps(functionPointer: RegisterCustomOps)  // onnxruntime-extensions-c pod")
    if runtime_opt:
        lines.append('try options.addConfigEntry(withKey: "session.enable_saved_runtime_optimizations", value: "1")')
    stem, ext = model["file"].rsplit(".", 1)
    lines.append(f'let path = Bundle.main.path(forResource: "{stem}", ofType: "{ext}")!')
    lines.append("let session = try ORTSession(env: env, modelPath: path, sessionOptions: options)")
    feeds = []
    for v in model["inputs"]:
        var = _var(v["name"])
        shape = _shape(v)
        if v["dtype"] == "tensor(string)":
            lines.append(f'let {var} = try ORTValue(tensorStringData: ["a sentence to embed"], shape: {shape})')
        elif _encoded(v):
            lines.append(f'let {var}Data = NSMutableData(contentsOf: Bundle.main.url(forResource: "photo", withExtension: "jpg")!)!  // JPEG or PNG file bytes')
            lines.append(f"let {var} = try ORTValue(tensorData: {var}Data, elementType: .uInt8, shape: [NSNumber(value: {var}Data.length)])")
        else:
            lines.append(f"let {var} = try ORTValue(tensorData: NSMutableData(length: {_prod(shape)} * 4), elementType: {_SWIFT_TYPES.get(v['dtype'], '.float')}, shape: {shape})  // fill with {v['dtype']}")
        feeds.append(f'"{v["name"]}": {var}')
    names = ", ".join(f'"{v["name"]}"' for v in model["outputs"])
    lines.append(f"let outputs = try session.run(withInputs: [{', '.join(feeds)}], outputNames: [{names}], runOptions: nil)")
    return "\n".join(lines)


def _cpp(model: dict, ep: str, runtime_opt: bool, extensions: bool) -> str:
    lines = ["#include <onnxruntime_cxx_api.h>"]
    if any(_encoded(v) for v in model["inputs"]):
        lines += ["#include <fstream>", "#include <iterator>", "#include <vector>"]
    lines += ["", 'Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "app");', "Ort::SessionOptions options;"]
    if _EP_CPP.get(ep):
        lines.append(_EP_CPP[ep])
    if extensions:
        lines.append('options.RegisterCustomOpsLibrary(ORT_TSTR("libortextensions.so"));  // from onnxruntime-extensions')
    if runtime_opt:
        lines.append('options.AddConfigEntry("session.enable_saved_runtime_optimizations", "1");')
    lines.append(f'Ort::Session session(env, ORT_TSTR("{model["file"]}"), options);')
    lines.append("Ort::AllocatorWithDefaultOptions allocator;")
    lines.append("auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);")
    names = []
    for v in model["inputs"]:
        var = _var(v["name"])
        shape = _shape(v)
        dims = ", ".join(map(str, shape))
        if v["dtype"] == "tensor(string)":
            lines.append(f"std::vector<int64_t> {var}_shape{{{dims}}};")
            lines.append(f"Ort::Value {var} = Ort::Value::CreateTensor(allocator, {var}_shape.data(), {var}_shape.size(), ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING);")
            lines.append(f'const char* {var}_text[] = {{"a sentence to embed"}};')
            lines.append(f"{var}.FillStringTensor({var}_text, 1);")
        elif _encoded(v):
            lines.append(f'std::ifstream {var}_file("photo.jpg", std::ios::binary);  // JPEG or PNG file bytes')
            lines.append(f"std::vector<uint8_t> {var}_data((std::istreambuf_iterator<char>({var}_file)), std::istreambuf_iterator<char>());")
            lines.append(f"std::vector<int64_t> {var}_shape{{static_cast<int64_t>({var}_data.size())}};")
            lines.append(f"Ort::Value {var} = Ort::Value::CreateTensor<uint8_t>(memory, {var}_data.data(), {var}_data.size(), {var}_shape.data(), {var}_shape.size());")
        else:
            ctype = _CPP_TYPES.get(v["dtype"], "float")
            lines.append(f"std::vector<int64_t> {var}_shape{{{dims}}};")
            lines.append(f"std::vector<{ctype}> {var}_data({_prod(shape)});  // fill: {v['dtype']} {v['shape']}")
            lines.append(f"Ort::Value {var} = Ort::Value::CreateTensor<{ctype}>(memory, {var}_data.data(), {var}_data.size(), {var}_shape.data(), {var}_shape.size());")
        names.append(var)
    in_names = ", ".join(f'"{v["name"]}"' for v in model["inputs"])
    out_names = ", ".join(f'"{v["name"]}"' for v in model["outputs"])
    lines.append(f"const char* input_names[] = {{{in_names}}};")
    lines.append(f"const char* output_names[] = {{{out_names}}};")
    lines.append(f"Ort::Value inputs[] = {{{', '.join(f'std::move({n})' for n in names)}}};")
    lines.append(f"auto outputs = session.Run(Ort::RunOptions{{nullptr}}, input_names, inputs, {len(names)}, output_names, {len(model['outputs'])});")
    return "\n".join(lines)


def _var(name: str) -> str:
    parts = [p for p in "".join(c if c.isalnum() else "_" for c in name).split("_") if p]
    text = parts[0].lower() + "".join(p.title() for p in parts[1:]) if parts else "x"
    return text if not text[0].isdigit() else "v" + text


def _prod(shape: list) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_WRITERS = {"kotlin": ("Android (Kotlin, onnxruntime-android)", "kotlin", _kotlin),
            "swift": ("iOS (Swift, onnxruntime-objc)", "swift", _swift),
            "cpp": ("Linux (C++, onnxruntime C++ API)", "cpp", _cpp)}


def readme(manifest: dict) -> str:
    """The bundle's README: contents, then one snippet per model file, for the bundle's platform."""
    platform = manifest["target"]
    title, fence, writer = _WRITERS[platform["language"]]
    runtime_opt = manifest["optimization"] == "runtime"
    out = [f"# {manifest['name']} for {platform['name']}", "",
           f"Built by edgeprune {manifest['edgeprune_version']} with onnxruntime {manifest['onnxruntime']['built_with']} "
           f"({manifest['optimization']}-style ORT format) for the {platform['ep']} execution provider.", "",
           "| file | role | bytes | sha256 |", "|---|---|---|---|"]
    out += [f"| {f['path']} | {f['role']} | {f['bytes']} | `{f['sha256'][:16]}…` |" for f in manifest["files"]]
    out += ["", f"Reduced build: `build.sh --minimal_build --include_ops_by_config {manifest['required_operators']}` "
            "(add `--enable_reduced_operator_type_support` to keep only the listed types)."]
    if manifest["custom_op_libraries"]:
        libs = "; ".join(f"{lib['name']} {lib['version']} for {', '.join(lib['domains'])}" for lib in manifest["custom_op_libraries"])
        out += ["", f"Register before creating the session: {libs}."]
    if runtime_opt:
        out += ["", "This .ort carries runtime optimizations: set `session.enable_saved_runtime_optimizations` to 1 "
                "(the snippet does) so the CPU EP applies them to what the EP leaves it."]
    for model in manifest["models"]:
        extensions = bool(model.get("custom_op_libraries"))
        out += ["", f"## {title}: {model['file']}", "", f"```{fence}", writer(model, platform["ep"], runtime_opt, extensions), "```"]
    out += ["", "Check the bundle: `edgeprune package --verify <this folder>` re-hashes every file and re-runs each model on the stored rows.", ""]
    return "\n".join(out)
