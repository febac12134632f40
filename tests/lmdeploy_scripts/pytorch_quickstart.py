# LMDeploy's quick start with PytorchEngineConfig and GenerationConfig (every 0.3 engine argument
# spelled out, as scripts copy them), unchanged but for the import line and the model path.
from tidemind import pipeline, GenerationConfig, PytorchEngineConfig  # was: from lmdeploy import ...

backend_config = PytorchEngineConfig(model_name='',
                                     tp=1,
                                     session_len=2048,
                                     max_batch_size=128,
                                     cache_max_entry_count=0.8,
                                     eviction_type='recompute',
                                     prefill_interval=16,
                                     block_size=64,
                                     num_cpu_blocks=0,
                                     num_gpu_blocks=0,
                                     adapters=None,
                                     max_prefill_token_num=4096,
                                     thread_safe=False,
                                     download_dir=None,
                                     revision=None)
gen_config = GenerationConfig(top_p=0.8,
                              top_k=40,
                              temperature=0.8,
                              max_new_tokens=1024)
pipe = pipeline('smollm2-135m',  # was: 'internlm/internlm2-chat-7b'
                backend_config=backend_config)
prompts = [[{
    'role': 'user',
    'content': 'Hi, pls intro yourself'
}], [{
    'role': 'user',
    'content': 'Shanghai is'
}]]
response = pipe(prompts, gen_config=gen_config)
print(response)
