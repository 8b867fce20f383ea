# `import mmrest` wherever a config that inherits this file is read (tools, OpenMMLab's
# inference APIs): the ResT registry and safe reading of mmengine checkpoints on torch >= 2.6
custom_imports = dict(imports=['mmrest'], allow_failed_imports=False)
